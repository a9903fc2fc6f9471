"""weightsync's control plane: the coordinator (no Kubernetes), the local demo mode that runs it
over local daemon processes, and the kopf operator that runs it for WeightSync resources."""
