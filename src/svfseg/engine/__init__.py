"""svfseg.engine"""
