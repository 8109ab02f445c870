DROP TABLE product_scripts;
DROP TABLE rule_rows;
DROP TABLE rule_dead_letters;
DROP TABLE rule_state;
DROP TABLE rules;
