"""A throwaway service used only to prove `shared.migrations`; its schema name is per test."""
