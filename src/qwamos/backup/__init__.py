"""Encrypted, compressed, incremental backups of volumes into a repository directory (docs/backup-format.md)."""
