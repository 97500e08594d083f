"""svfseg.models.backbones"""
