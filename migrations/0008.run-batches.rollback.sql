DROP TABLE persistence_run_batches;
