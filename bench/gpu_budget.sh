# Sourced by the one-call GPU scripts (bench/gpu_*.sh): results under O ($OUT on the device
# machine), the repository on the path, and `left N`: N seconds, or what is left of the call's
# TOTAL seconds (default: the caller's DEFAULT_TOTAL) if that is less. Prints the card.
O=${OUT:-/tmp/out}
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
end=$(( $(date +%s) + ${TOTAL:-${DEFAULT_TOTAL:-300}} ))
left() { local l=$(( end - $(date +%s) )); [ "$l" -lt 1 ] && l=1; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
