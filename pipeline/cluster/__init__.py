"""Training beyond one machine: the nodes of a multi-node torchrun started by a cluster's scheduler."""
