-- Schema version 3 belongs to the principals and resource policies of the API's authorization,
-- which come with it; this placeholder keeps the versions consecutive until then and changes
-- nothing.
SELECT 1;
