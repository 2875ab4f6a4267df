"""The Heimdall PostgreSQL + S3 source: schema migrations, demo seeding, and the postgres export."""
