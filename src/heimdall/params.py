"""Typed schema of params.yaml: one section per stage, validated before any work.

Every stage calls :func:`load_params` first; a bad file fails with one line that
lists every problem by its dotted key path (``export_sessions.n_sessions: ...``).
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from heimdall.errors import HeimdallError

DEFAULT_PARAMS = Path("params.yaml")
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and torch.manual_seed take 32-bit seeds


def _admits_bool(annotation) -> bool:
    """Whether a field's type accepts a bool (bool itself, or a union / Annotated holding it)."""
    if annotation is bool:
        return True
    return any(_admits_bool(a) for a in get_args(annotation))


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise; NaN / ±Inf is never a parameter value.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info: ValidationInfo):
        # pydantic's lax mode reads `max_epochs: true` as 1: a bool is only a bool
        if isinstance(v, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number or text, got the boolean {str(v).lower()}")
        return v


def _latlon(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and not (-90 <= v[0] <= 90 and -180 <= v[1] <= 180):
        raise ValueError(f"{list(v)} is not [latitude, longitude] in degrees (|lat| <= 90, |lon| <= 180)")
    return v


class Receiver(_Section):
    name: str = Field(min_length=1)
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    altitude_m: float = Field(ge=-500, le=9000)


PositiveFloat = Annotated[float, Field(gt=0)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class ScenarioParams(_Section):
    """The simulated world: receivers, propagation and the campaign's statistics."""

    seed: Seed
    receivers: list[Receiver]
    area_margin_km: float = Field(ge=0, le=500)
    frequency_mhz: float = Field(gt=1, le=6000)
    tx_power_dbm: tuple[float, float]
    path_loss_model: Literal["log_distance"]
    path_loss_exponent: float = Field(ge=1.5, le=6)
    tx_height_m: float = Field(gt=0, le=200)
    shadowing_sigma_db: float = Field(ge=0, le=20)
    shadowing_correlation_km: PositiveFloat
    shadowing_n_features: int = Field(ge=16, le=16384)
    receiver_gain_offset_db: float = Field(ge=0, le=20)
    noise_floor_dbm: float = Field(ge=-180, le=-50)
    noise_floor_spread_db: float = Field(ge=0, le=20)
    noise_bandwidth_hz: PositiveFloat
    rician_k_db: tuple[float, float]
    doppler_hz: tuple[float, float]
    fm_deviation_hz: PositiveFloat
    outage_probability: float = Field(ge=0, lt=1)

    @field_validator("receivers")
    @classmethod
    def _at_least_three(cls, v: list[Receiver]) -> list[Receiver]:
        if len(v) < 3:
            raise ValueError(f"needs at least 3 receivers to localize, got {len(v)}")
        names = [r.name for r in v]
        if len(set(names)) != len(names):
            raise ValueError("receiver names must be unique")
        return v

    @field_validator("tx_power_dbm", "rician_k_db", "doppler_hz")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"range must be [low, high], got {list(v)}")
        return v

    @field_validator("doppler_hz")
    @classmethod
    def _non_negative(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] < 0:
            raise ValueError("Doppler must be >= 0 Hz")
        return v


class PostgresSourceParams(_Section):
    """Filters for ``source: postgres`` (docs/sources.md). The connection (HEIMDALL_DB_URL) and S3
    credentials come from the environment only, so no secret can reach dvc.lock or MLflow."""

    s3_bucket: str = Field(default="heimdall-raw-iq", min_length=3, max_length=63)
    start_time: datetime | None = None  # sessions starting at or after (ISO 8601; no zone = UTC)
    end_time: datetime | None = None  # ... and strictly before
    frequency_min_hz: float | None = Field(default=None, ge=0)
    frequency_max_hz: float | None = Field(default=None, ge=0)
    min_receivers: int = Field(default=1, ge=1)
    validated_sources_only: bool = False
    default_altitude_m: float = Field(default=0.0, ge=-500, le=9000)  # stations with NULL altitude_asl
    iq_errors: Literal["skip", "fail"] = "skip"  # IQ object missing/corrupt: drop that IQ (counted) or fail
    empty_sessions: Literal["fail", "skip"] = "fail"  # approved session with no usable receiver

    @field_validator("start_time", "end_time")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return v.replace(tzinfo=timezone.utc) if v is not None and v.tzinfo is None else v

    @model_validator(mode="after")
    def _ordered(self) -> "PostgresSourceParams":
        if self.start_time and self.end_time and self.start_time >= self.end_time:
            raise ValueError("start_time must be before end_time")
        if (self.frequency_min_hz is not None and self.frequency_max_hz is not None
                and self.frequency_min_hz > self.frequency_max_hz):
            raise ValueError("frequency_min_hz must not exceed frequency_max_hz")
        return self


class ExportSessionsParams(_Section):
    source: Literal["synthetic", "postgres"]
    seed: Seed
    n_sessions: int = Field(gt=0, le=10_000_000)
    sample_rate_hz: int = Field(gt=0, le=10_000_000)
    duration_s: PositiveFloat
    iq_storage: Literal["int16"] = "int16"
    postgres: PostgresSourceParams = PostgresSourceParams()

    @model_validator(mode="after")
    def _enough_samples(self) -> "ExportSessionsParams":
        if self.n_samples < 64:
            raise ValueError(
                f"sample_rate_hz * duration_s = {self.n_samples} samples; need at least 64"
            )
        return self

    @property
    def n_samples(self) -> int:
        return int(round(self.sample_rate_hz * self.duration_s))


SPLITS_DIR = "splits"  # held-out lists (split.strategy: list) live here: extract_features depends on it


class SplitParams(_Section):
    """How sessions are assigned to train / val / test (heimdall.splits; docs/params.md)."""

    strategy: Literal["random", "spatial_blocks", "by_group", "time", "area", "list"]
    val_fraction: float = Field(gt=0, lt=0.5)
    # 0: a production run (random, by_group, spatial_blocks, or time without dates): every labelled
    # session but val trains, nothing is held out, evaluate reports no accuracy (docs/params.md "Splits")
    test_fraction: float = Field(ge=0, lt=0.5)
    block_size_km: PositiveFloat = 10.0
    seed: Seed
    # strategy: time — test = sessions starting in [test_from, test_until) (ISO 8601; either may be
    # left out; neither: the latest test_fraction of sessions)
    test_from: str | None = None
    test_until: str | None = None
    # strategy: area — test = transmitters inside [lat_min, lon_min, lat_max, lon_max] (degrees)
    test_area: tuple[float, float, float, float] | None = None
    # strategy: list — test = the session ids in this file (one per line), a file under splits/
    test_ids_file: str | None = None

    @field_validator("test_from", "test_until", mode="before")
    @classmethod
    def _yaml_date(cls, v):
        # YAML (and so `dvc exp run -S key=2022-11-01`) reads an unquoted date as a date: keep its text
        return v.isoformat() if isinstance(v, (date, datetime)) else v

    @field_validator("test_from", "test_until")
    @classmethod
    def _iso_time(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an ISO 8601 date or datetime (e.g. 2022-11-01)") from None
        return v

    @field_validator("test_area")
    @classmethod
    def _box(cls, v):
        if v is not None:
            lat_min, lon_min, lat_max, lon_max = v
            if not (-90 <= lat_min < lat_max <= 90 and -180 <= lon_min < lon_max <= 180):
                raise ValueError(f"{list(v)} is not [lat_min, lon_min, lat_max, lon_max] in degrees with min < max")
        return v

    @field_validator("test_ids_file")
    @classmethod
    def _under_splits(cls, v: str | None) -> str | None:
        if v is not None:
            parts = Path(v).parts
            if Path(v).is_absolute() or len(parts) < 2 or parts[0] != SPLITS_DIR or ".." in parts:
                raise ValueError(f"{v!r} must be a file under {SPLITS_DIR}/ (a dependency of extract_features, so "
                                 "that editing the list reruns the pipeline)")
        return v

    @model_validator(mode="after")
    def _strategy_needs(self) -> "SplitParams":
        needs = {"area": ("test_area", self.test_area), "list": ("test_ids_file", self.test_ids_file)}
        if self.strategy in needs and needs[self.strategy][1] is None:
            raise ValueError(f"strategy '{self.strategy}' needs {needs[self.strategy][0]}")
        unused = [k for k, strat in (("test_from", "time"), ("test_until", "time"), ("test_area", "area"),
                                     ("test_ids_file", "list")) if getattr(self, k) is not None and self.strategy != strat]
        if unused:
            raise ValueError(f"{', '.join(unused)} only apply to strategy "
                             f"'{ {'test_area': 'area', 'test_ids_file': 'list'}.get(unused[0], 'time') }', not '{self.strategy}'")
        if self.test_fraction == 0 and self.strategy in ("area", "list"):
            raise ValueError(f"test_fraction 0 (a production run) does not apply to strategy '{self.strategy}', "
                             "whose test split is its area or list (use random, by_group or spatial_blocks)")
        return self


class ExtractFeaturesParams(_Section):
    n_fft: int = Field(ge=16, le=8192)
    n_mels: int = Field(ge=2, le=512)
    n_frames: int = Field(ge=1, le=4096)
    batch_sessions: int = Field(ge=1, le=100_000)
    origin: tuple[float, float] | None = None  # [lat, lon] of the ENU origin; None: the receivers' mean
    # sessions whose transmitter is farther than this from every receiver are excluded (and counted): a
    # position no receiver could hear, e.g. a GPS fix without a position at (0, 0) (docs/params.md)
    max_target_distance_km: float = Field(default=500.0, gt=0, le=20100)
    split: SplitParams

    @field_validator("origin")
    @classmethod
    def _origin_latlon(cls, v):
        return _latlon(v)

    @field_validator("n_mels")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("n_mels must be even (half the bands each side of the carrier)")
        return v


class ModelParams(_Section):
    """LocalizationNet architecture (docs/model.md)."""

    inputs: Literal["spectrogram", "scalars", "both"]
    cnn_width: int = Field(ge=4, le=256)
    cnn_depth: int = Field(ge=1, le=6)
    cnn_pool: int = Field(ge=1, le=16)
    d_model: int = Field(ge=8, le=1024)
    n_heads: int = Field(ge=1, le=32)
    n_layers: int = Field(ge=0, le=12)
    dropout: float = Field(ge=0, lt=1)
    head: Literal["direct", "receivers"] = "direct"  # mean: regressed, or receivers' weighted centroid + offset
    # readings no map cell explains: "none" (trust the map's σ), "scale" (widen the likelihood by the best
    # cell's misfit per degree of freedom when above 1) or "posterior" (widen the network's prior by it
    # too; docs/model.md "Misfit")
    misfit: Literal["none", "scale", "posterior"] = "none"
    # nearest training sessions whose positions add fingerprint evidence to the posterior (0: off)
    fingerprint_k: int = Field(default=0, ge=0, le=64)
    # > 0: Student-t readings with this many degrees of freedom, so one reading far from the map (a gain
    # that moved) cannot outvote the rest; 0: Gaussian (docs/model.md "Misfit")
    likelihood_nu: float = Field(default=0.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelParams":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.cnn_width % 4:
            raise ValueError(f"cnn_width ({self.cnn_width}) must be a multiple of 4 (GroupNorm groups)")
        return self


class RadioMapParams(_Section):
    """The learned forward radio map used by the likelihood refinement and the kriged baseline."""

    spacing_km: float = Field(gt=0.05, le=20)
    margin_km: float = Field(ge=0, le=200)
    min_snr_db: float = Field(ge=-30, le=60)
    # the map's own uncertainty in the likelihood: σ² per cell grows away from training readings, so a
    # transmitter where nobody trained is not confidently placed where somebody did (docs/model.md)
    uncertainty: bool = False
    # the per-receiver GP: exact (O(n³) in its training readings), sparse (inducing points: about linear),
    # auto = exact up to 5,000 readings, sparse beyond (heimdall.gp.EXACT_GP_MAX_READINGS)
    gp: Literal["auto", "exact", "sparse"] = "auto"
    # receivers fitted in parallel processes (joblib): the same map for any value
    n_jobs: int = Field(default=1, ge=1, le=256)


class TrainParams(_Section):
    seed: Seed
    lr: float = Field(gt=0, le=1)
    weight_decay: float = Field(ge=0, le=1)
    batch_size: int = Field(ge=1, le=65536)
    max_epochs: int = Field(ge=1, le=10000)
    # training sessions seen in all (epochs x training sessions) at most: epochs = min(max_epochs,
    # ceil(max_samples / training sessions)), so a large campaign trains in bounded time (TrainParams.epochs)
    max_samples: int = Field(default=300_000, ge=1, le=10**10)
    patience: int = Field(ge=1, le=1000)
    gradient_clip: float = Field(gt=0)
    augment_power_db: float = Field(ge=0, le=40)
    augment_drop_receiver: float = Field(ge=0, lt=1)
    # Lightning hardware: auto picks a GPU when there is one (docs/performance.md); ddp with devices > 1
    # is Lightning's DistributedDataParallel, one process per device.
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    strategy: Literal["auto", "ddp"] = "auto"
    num_nodes: int = Field(default=1, ge=1, le=1024)  # multi-node ddp: launched by torchrun/SLURM per node
    radio_map: RadioMapParams
    mlflow_experiment: str = Field(min_length=1)

    def epochs(self, n_train: int) -> int:
        """Epochs to train for on ``n_train`` sessions: max_epochs, fewer where that would see more than
        max_samples sessions (the default campaign's 4,200 x 40 = 168,000 does not; 70,000 gets 5)."""
        return max(1, min(self.max_epochs, -(-self.max_samples // max(n_train, 1))))


class ExportOnnxParams(_Section):
    opset: int = Field(ge=17, le=23)
    max_abs_diff: float = Field(gt=0, le=1)
    latency_runs: int = Field(ge=10, le=100_000)


class RegisterParams(_Section):
    model_name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    mlflow_experiment: str = Field(min_length=1)


class Params(_Section):
    """The whole params.yaml."""

    scenario: ScenarioParams
    export_sessions: ExportSessionsParams
    extract_features: ExtractFeaturesParams
    model: ModelParams
    train: TrainParams
    export_onnx: ExportOnnxParams
    # `register` is the params.yaml key; the attribute is `registry` (BaseModel's metaclass owns `register`)
    registry: RegisterParams = Field(alias="register")

    def section_hash(self, *sections: str) -> str:
        """sha256 of the canonical JSON of the given sections (lineage tag for exported models)."""
        import hashlib
        import json

        data = {s: self.model_dump(mode="json")[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _format_errors(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        problems.append(f"{path}: {e['msg']}")
    return f"{source}: invalid params: " + "; ".join(problems)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise HeimdallError with every problem on one line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HeimdallError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise HeimdallError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise HeimdallError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise HeimdallError(_format_errors(e, str(path))) from None
