import sys

print("about to fail", file=sys.stderr)
print("database is on fire", file=sys.stderr)
sys.exit(3)
