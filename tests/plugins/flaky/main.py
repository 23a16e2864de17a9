import sys

print("flaky failure", file=sys.stderr)
sys.exit(1)
