//! Durable storage (placeholder; being written).
