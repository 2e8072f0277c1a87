#!/usr/bin/env bash
# Regenerates the Python modules for src/zerotunnel/proto/*.proto with grpcio-tools from .venv.
#
# Run it after editing a .proto; commit the .proto and the generated files together. Protos are compiled
# with `-I src`, so each module is registered as `zerotunnel/proto/<name>.proto` and imports its siblings
# as `zerotunnel.proto.<name>_pb2` without any rewriting.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=src/zerotunnel/proto
PROTO_INCLUDE="$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

"$PY" -m grpc_tools.protoc -I src -I "$PROTO_INCLUDE" \
  --python_out=src --pyi_out=src --grpc_python_out=src \
  "$OUT"/*.proto

# workload.proto has no package (upstream's choice, and it makes the method paths `/SpiffeWorkloadAPI/...`),
# so its message names are global and clash with py-spiffe's copy in the default descriptor pool.
# Load it into a private pool (with its one dependency, struct.proto) so both can be imported together.
W="$OUT/workload_pb2.py"
sed -i 's/^DESCRIPTOR = _descriptor_pool\.Default()\.AddSerializedFile(/_POOL = _descriptor_pool.DescriptorPool()\n_POOL.AddSerializedFile(google_dot_protobuf_dot_struct__pb2.DESCRIPTOR.serialized_pb)\nDESCRIPTOR = _POOL.AddSerializedFile(/' "$W"
grep -q '^DESCRIPTOR = _POOL\.AddSerializedFile(' "$W" || { echo "gen-proto: could not patch $W for a private pool" >&2; exit 1; }

# The .pyi stubs give callers typed constructors and fields; pyproject's ruff/mypy excludes name only the
# generated .py files, so the stubs carry their own opt-outs (they are generated, not ours to lint).
for f in "$OUT"/*_pb2.pyi; do
  sed -i '1i # mypy: ignore-errors\n# ruff: noqa' "$f"
done

"$PY" -c 'import zerotunnel.proto.ca_pb2_grpc, zerotunnel.proto.workload_pb2_grpc, spiffe._proto.workload_pb2'
echo "gen-proto: regenerated $(ls "$OUT"/*_pb2*.py* | wc -l) files in $OUT" >&2
