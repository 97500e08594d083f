"""svfseg.models"""
