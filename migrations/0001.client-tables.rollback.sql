DROP TABLE client_messages;
DROP TABLE client_sessions;
