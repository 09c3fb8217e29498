"""Prompt templates and fixed strings of the published method (PersonaMagic's constants)."""

# Captions for the reconstruction loss: the 27 small ImageNet templates of textual inversion.
IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

# "Open" scene prompts for the Tandem Equilibrium term (published list, wording kept as is).
SCENE_TEMPLATES = (
    "A {} is giving a speech on the podium",
    "A {} is walking on the red carpet at the evening gala",
    "A {} is holding a Halloween pumpkin lantern",
    "A {} is reading a book",
    "A {} wearing winter camo military gear in the snow",
    "A {} sitting in a hammock",
    "A photo of {} as an knight in armor",
    "A {} as a police officer",
    "A photo of {} in the lab",
    "A {} sitting a leather sofa",
    "A {} is reading newspaper, sitting in a busy train",
    "A {} in a jungle",
    "A {} is playing the piano",
    "A {} is doing a skateboard",
    "A {} is riding a motorcycle, road background",
    "{} is working on a beautiful design project, creating design projects, in a beautiful workspace",
    "{} driving a racing car",
    "{} floats on a raft along the street of a flooded city",
    "{} baking pizza in front of a wood-fired oven",
    "{} plays bass guitar on stage",
)

# Published inference negative prompt.
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"

# CLIPSeg mask prompts of the published segmentation script (sigmoid outputs are averaged).
CLIPSEG_TEMPLATES = (
    "a photo of a {}",
    "a good photo of a {}",
    "the photo of a {}",
    "a good photo of the {}",
    "image of a {}",
    "image of the {}",
    "A photograph of {}",
    "A {} shown in a photo",
    "A photo of {}",
)
