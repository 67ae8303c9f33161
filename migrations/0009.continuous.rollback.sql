DROP TABLE continuous_activity;
DROP TABLE continuous_watcher;
DROP TABLE continuous_pending;
