DROP TABLE persistence_kept_records;
