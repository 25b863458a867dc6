"""The wildzoo catalog: Parquet shards of models, tensors, tokens and properties, queried with DuckDB."""
