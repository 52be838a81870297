#!/usr/bin/env bash
# Regenerate cluster/specmoe_pb2.py and specmoe_pb2_grpc.py from specmoe.proto.
# Needs grpcio-tools (not a runtime dependency; use a throwaway venv:
#   python3 -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools==1.85.1
#   PY=/tmp/gt/bin/python cluster/gen_proto.sh). Commit the generated files.
set -euo pipefail
cd "$(dirname "$0")"
"${PY:-python3}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. specmoe.proto
# grpc_tools writes an absolute import; the module lives in the specmoe.cluster package.
sed -i 's/^import specmoe_pb2 as specmoe__pb2$/from . import specmoe_pb2 as specmoe__pb2/' specmoe_pb2_grpc.py
