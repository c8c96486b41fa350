"""Backbones by name and projection heads."""
from dogo.models.backbones import BACKBONES, Backbone, backbone_spec, build_backbone, register_backbone
from dogo.models.heads import Peer, projection_head

__all__ = ["BACKBONES", "Backbone", "backbone_spec", "build_backbone", "register_backbone", "Peer", "projection_head"]
