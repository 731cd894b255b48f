"""Everything between a dataset's source and a batch of tensors, and nothing about models.

The package owns getting an image-folder dataset into ``data/raw``
(:mod:`~transferlab.data.sources`: builtins, downloads, layout checks;
:mod:`~transferlab.data.archives`: safe zip/tar extraction), decoding images the
one way training and serving share (:mod:`~transferlab.data.imaging`: limits,
EXIF orientation, RGB), the ingest stage that writes ``data/prepared``
(:mod:`~transferlab.data.ingest`), the train/val/test split
(:mod:`~transferlab.data.split`) and the image Dataset and DataLoader that feed
a model (:mod:`~transferlab.data.images`). It may use torch and torchvision but
never imports ``transferlab.models``, ``training``, ``evaluation`` or ``serving``.
"""
