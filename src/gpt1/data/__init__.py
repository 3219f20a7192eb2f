"""Data: raw corpora -> documents (`sources`), token shards, chat conversations."""
