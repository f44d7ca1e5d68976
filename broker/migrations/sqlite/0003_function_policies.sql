-- Resource-based policies of functions (AddPermission, RemovePermission, GetPolicy): one
-- policy document per function or qualified function (`f`, `f:live`), as Lambda keeps one per
-- version and alias, with the revision id that makes each change a compare-and-swap.
CREATE TABLE function_policies (
    function TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    revision_id TEXT NOT NULL);
