"""dogo export: one peer's backbone as a plain torchvision or timm state_dict, and the lines that load it."""
from __future__ import annotations

from dogo.commands.args import say

HELP = "write one peer's backbone as a plain torchvision or timm state_dict"
DESCRIPTION = (
    "one peer's backbone as a plain state_dict of its library (torchvision, or timm for a timm: peer; a "
    "torchvision ResNet without the CIFAR stem also as timm's ResNet; dogo's own CIFAR ResNets, which no library "
    "ships, as dogo's), with the lines that load it with that library alone (a CIFAR stem rebuilt in plain torch); "
    "--head also writes its projection head (with the backbone, a "
    "DisCo teacher from files)")


def add(sub) -> None:
    x = sub.add_parser("export", help=HELP, description=DESCRIPTION)
    x.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    x.add_argument("out", help="output .pt file")
    x.add_argument("--peer", help="which peer to export (default: the run's only peer)")
    x.add_argument("--head", metavar="OUT", help="also write the peer's projection head's state_dict here "
                   "(with the backbone, a DisCo teacher: teacher.backbone=... teacher.head=...)")
    x.add_argument("--format", choices=["torchvision", "timm", "dogo"],
                   help="the library the state_dict loads into (default: the backbone's own; a torchvision ResNet "
                        "without the CIFAR stem also loads into timm's ResNet of the same name)")
    x.set_defaults(func=run)


def run(args) -> int:
    from dogo.engine.eval.saved import SavedRun
    from dogo.engine.run.export import export_peer
    saved = SavedRun.open(args.checkpoint)
    peer = saved.peer_name(args.peer)
    done = export_peer(saved, peer, args.out, args.format, args.head)
    if done.head:
        say(f"wrote {done.head}: the projection head of peer '{peer}' ({done.head_tensors} tensors)")
    say(f"wrote {done.backbone}: the {saved.cfg.peers[peer].arch} backbone of peer '{peer}' ({done.tensors} "
        f"tensors); load it with {done.library} alone:")
    for line in done.load_lines:
        say(f"    {line}")
    return 0
