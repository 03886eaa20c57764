"""The Open Inference Protocol over gRPC (needs the ``grpc`` extra: grpcio, tritonclient[grpc]).

The message classes and the servicer base are the ones tritonclient ships,
generated from Triton's ``grpc_service.proto``: the server speaks exactly the
protocol its clients were generated from.
"""
