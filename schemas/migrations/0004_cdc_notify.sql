-- The CDC source's wake-up: a statement that changes a table the source streams notifies the
-- channel `llamaflow_cdc` (delivered at commit, once per transaction and table), so the source
-- reads the change at once instead of at its next poll. Without these triggers (tables
-- managed elsewhere) the source still polls every `poll_interval_ms`.
CREATE OR REPLACE FUNCTION llamaflow_cdc_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('llamaflow_cdc', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER alert_rules_cdc_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON alert_rules
    FOR EACH STATEMENT EXECUTE FUNCTION llamaflow_cdc_notify();
CREATE OR REPLACE TRIGGER protocols_cdc_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON protocols
    FOR EACH STATEMENT EXECUTE FUNCTION llamaflow_cdc_notify();
CREATE OR REPLACE TRIGGER api_keys_cdc_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION llamaflow_cdc_notify();
CREATE OR REPLACE TRIGGER users_cdc_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION llamaflow_cdc_notify();
CREATE OR REPLACE TRIGGER user_devices_cdc_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON user_devices
    FOR EACH STATEMENT EXECUTE FUNCTION llamaflow_cdc_notify();
