-- Live subscriptions held per principal across every storage replica (the limit
-- STREAMMESH_STORAGE_SUBSCRIBE_MAX_PER_PRINCIPAL; services/storage/subscription_leases.py).
-- A row is one running subscription, renewed by its replica while it runs and deleted when it
-- ends; a replica that dies without deleting its rows stops renewing them, and a row past
-- expires_at no longer counts. Admission counts a principal's live rows under a transaction
-- advisory lock on the principal, so two replicas admitting at once cannot both take the last
-- place.
CREATE TABLE subscription_leases (
    lease_id uuid PRIMARY KEY,
    tenant text COLLATE "C" NOT NULL,
    principal text COLLATE "C" NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX subscription_leases_by_principal
    ON subscription_leases (tenant, principal, expires_at);
