"""stepstream runtime: the Step-3.5 model, generation, the CLI, the server and benchmarks."""
