"""Label conventions shared by data, losses, metrics and pictures: 0 background, 1..C classes, 255 ignored."""

#: Pixels with this label are not scored and carry no loss (object borders, crowds, padding).
IGNORE_LABEL = 255
