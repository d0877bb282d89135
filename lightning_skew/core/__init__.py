"""What every technique shares: batch operations, row sets and lookups, table discovery, collectives, hashing."""
