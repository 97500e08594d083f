"""Raw public datasets read by `svfseg prepare`: VOC2012 + SBD, COCO 2014 (never read at training time)."""
