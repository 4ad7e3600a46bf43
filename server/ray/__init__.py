"""LoraPoolService scaled out on Ray Serve: many engine replicas behind one gRPC
address (Serve's gRPC proxy), routed by adapter affinity (Serve's model
multiplexing keyed by adapter id). `lorapool serve-ray` starts it; see
docs/ray.md. Needs the `ray` extra (`pip install 'lorapool[ray]'`)."""
