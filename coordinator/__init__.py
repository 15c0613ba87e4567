"""The saga coordinator: runs sagas over gRPC, durably, and compensates on failure."""
