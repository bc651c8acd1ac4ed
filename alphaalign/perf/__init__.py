"""Benchmarks (`alphaalign bench`, `make bench`): alphaalign vs trl's GRPOTrainer on one workload, the
model-work floors, and reward throughput. Results go to `bench/results.json`; see docs/benchmarks.md."""
