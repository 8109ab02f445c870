DROP TABLE thing_models;
