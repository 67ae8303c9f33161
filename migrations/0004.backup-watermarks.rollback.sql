DROP TABLE backup_watermarks;
