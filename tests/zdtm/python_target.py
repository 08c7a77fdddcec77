# python3 target: a large bytearray and a dict survive restore; the loop keeps counting from where
# it was (the runner compares the COUNT lines printed before capture and after restore).
import hashlib
import os
import sys
import time

go = os.environ["ZDTM_GO"]
if os.path.exists(go):
    print("FAIL: go file exists before capture", flush=True)
    sys.exit(1)

block = bytes(range(251))
big = bytearray(block * (50 * 1024 * 1024 // len(block) + 1))[: 50 * 1024 * 1024]
big[12345] = 7
table = {f"key{i}": (i, str(i * i), [i] * (i % 5)) for i in range(200_000)}
digest = hashlib.sha256(big).hexdigest()
table_items = len(table)

print("READY", flush=True)
n = 0
while not os.path.exists(go):
    n += 1
    if n % 10 == 0:
        print(f"COUNT {n}", flush=True)
    time.sleep(0.005)
print(f"COUNT {n} final", flush=True)

if len(big) != 50 * 1024 * 1024 or hashlib.sha256(big).hexdigest() != digest:
    print("FAIL: the 50 MB bytearray changed", flush=True)
    sys.exit(1)
if len(table) != table_items:
    print(f"FAIL: dict has {len(table)} items, had {table_items}", flush=True)
    sys.exit(1)
for i in range(0, 200_000, 997):
    if table[f"key{i}"] != (i, str(i * i), [i] * (i % 5)):
        print(f"FAIL: dict entry key{i} changed", flush=True)
        sys.exit(1)
# the interpreter still works: allocate, import, hash
more = [bytes([i % 256]) * 1000 for i in range(1000)]
import json  # noqa: E402

if json.loads(json.dumps({"a": len(more)})) != {"a": 1000}:
    print("FAIL: json round trip", flush=True)
    sys.exit(1)
print("PASS", flush=True)
