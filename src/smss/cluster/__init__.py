"""SMSS on a Ray cluster: the controller, one node agent per Ray node, a gateway per node.

The only package that imports ray, and within it only the modules named ``ray_*``;
the rest (the view gateways route by, the gateway's routing, node membership) is plain
Python, tested without Ray.

=====================  ==========================================================
module                 what it holds
=====================  ==========================================================
``view``               what the controller tells gateways: functions, instances, nodes, RTTs
``edge``               a gateway's routing: dispatchers fed by the view, load reports
``edge_app``           the gateway's HTTP app: inference here, everything else to the controller
``membership``         which nodes are up: Ray's node table and the agents' heartbeats
``agent_report``       what agents report (resident memory, weight stores, RTTs, exits)
``ray_backend``        the ClusterBackend over the agents, in the controller's process
``ray_actors``         what the actors share: settings on the wire, the controller's handle
``ray_controller``     the actor ``smss-controller``: the platform, the view, reports, passed routes
``ray_agent``          the actor ``smss-agent-<node>``: a node agent, its relay, heartbeats, probes
``ray_gateway``        the actor ``smss-gateway-<node>``: HTTP on its node
``ray_testkit``        SMSS on Ray's multi-node test cluster on one machine (benchmarks)
``ray_launch``         ``smss serve --backend ray``: join (or start) a cluster, find or start the controller
=====================  ==========================================================
"""
