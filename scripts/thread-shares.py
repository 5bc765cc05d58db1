#!/usr/bin/env python3
# thread-shares.py THREADPREFIX [N] < perf-script-output
#
# From `perf script` output of a `perf record -g` profile: each thread's share of all samples,
# then, for the threads whose name starts with THREADPREFIX (e.g. raftsql-sm, raftsql-raft,
# tokio-rt), the N functions with the largest inclusive share of their samples (the function
# is anywhere on the stack) and the 25 with the largest self share (on top of the stack).
# benches/profile-node.sh runs it on the state machine thread.
import sys,re,collections,signal
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # | head is fine
pref=sys.argv[1]; N=int(sys.argv[2]) if len(sys.argv)>2 else 40
tot=0; all_=0; inc=collections.Counter(); selfc=collections.Counter(); th=collections.Counter()
for block in sys.stdin.read().split("\n\n"):
    lines=[l for l in block.split("\n") if l.strip()]
    if not lines: continue
    comm=lines[0].split()[0]; all_+=1; th[comm]+=1
    if not comm.startswith(pref): continue
    tot+=1; seen=set(); first=True
    for l in lines[1:]:
        p=l.strip().split(None,1)
        if len(p)<2: continue
        sym=re.sub(r"\+0x[0-9a-f]+$","",p[1].rsplit(" (",1)[0]); sym=re.sub(r"::h[0-9a-f]{16}$","",sym)
        sym=sym[:110]
        if first: selfc[sym]+=1; first=False
        if sym not in seen: seen.add(sym); inc[sym]+=1
print("threads:", ", ".join(f"{k} {v*100/all_:.1f}%" for k,v in th.most_common(8)))
print(f"{pref}: {tot} of {all_} samples")
print("-- inclusive")
for k, v in inc.most_common(N):
    print(f"{v*100/tot:5.1f}% {k}")
print("-- self")
for k, v in selfc.most_common(25):
    print(f"{v*100/tot:5.1f}% {k}")
