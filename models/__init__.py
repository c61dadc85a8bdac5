"""Reference models: seeded builders, the trained digits fixtures and the real-model corpus fetcher."""
