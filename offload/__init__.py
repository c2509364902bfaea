"""Expert placement, the RAM expert cache, NVMe streaming and prefetch."""
