"""The gRPC edge: servicers, the participant gateway, proto conversion and the error table."""
