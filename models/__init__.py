"""Backbones by name (registered in dogo.core.registry.BACKBONES) and projection heads."""
from dogo.models.backbones import Backbone, build_backbone
from dogo.models.heads import Peer, Prototypes, projection_head

__all__ = ["Backbone", "build_backbone", "Peer", "Prototypes", "projection_head"]
