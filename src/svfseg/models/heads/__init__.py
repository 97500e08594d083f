"""svfseg.models.heads"""
