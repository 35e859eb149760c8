"""A CPU training step with spinning and with sleeping OpenMP threads, on an idle machine and with cores kept busy.

    python benchmarks/wait_policy.py [--busy 1] [--steps 20]

Each measurement is a fresh process (the wait policy is read once, when torch loads) timing ResNet-18 SGD steps on
a fixed batch (64 images, 32 px) with every core the process may use. "spin" is OpenMP's default (threads spin a
while after each parallel region), "sleep" is OMP_WAIT_POLICY=PASSIVE, what `import common` sets.
"""
import argparse
import os
import subprocess
import sys
import time

from busy import busy_cores

CHILD = """
import time, torch, torchvision
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10)
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
for i in range({warmup} + {steps}):
    if i == {warmup}:
        t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print({steps} / (time.perf_counter() - t))
"""


def steps_per_s(policy, busy, steps, warmup=5):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    if policy == "sleep":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    with busy_cores(busy):
        out = subprocess.run([sys.executable, "-c", CHILD.format(steps=steps, warmup=warmup)], env=env,
                             capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=1, help="cores kept busy in the loaded measurements (default: 1)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default: 20)")
    a = p.parse_args()
    rate = {}
    for busy in (0, a.busy):  # idle first, then loaded; spin and sleep side by side in each
        for policy in ("spin", "sleep"):
            t = time.time()
            rate[policy, busy] = steps_per_s(policy, busy, a.steps)
            print(f"{policy:5s} threads, {busy} core(s) busy: {rate[policy, busy]:6.2f} steps/s "
                  f"({time.time() - t:.0f} s)", flush=True)
    for busy in (0, a.busy):
        print(f"sleep / spin, {busy} core(s) busy: {rate['sleep', busy] / rate['spin', busy]:.2f}x steps/s")


if __name__ == "__main__":
    main()
