"""Two-word device names such as "Atomic Mammal"."""

from __future__ import annotations

import secrets

ADJECTIVES = """Atomic Brave Calm Clever Cosmic Crimson Daring Eager Electric Enormous Fancy Fearless Gentle Golden
Happy Hidden Humble Icy Jolly Keen Lively Lucky Mellow Mighty Misty Nimble Noble Polar Proud Quick Quiet
Rapid Royal Rustic Silent Silver Smooth Solar Sonic Spicy Steady Stormy Sunny Swift Tidy Tiny Vivid Wild
Witty Zesty Amber Bold Breezy Bright Cheerful Crystal Dusty Frosty Glowing Grand Hazy Jade Lunar""".split()
ANIMALS = """Mammal Elephant Falcon Otter Panda Tiger Lynx Heron Badger Beaver Bison Cobra Coyote Crane Dingo
Dolphin Eagle Ferret Gecko Gazelle Hawk Hippo Ibis Jaguar Koala Lemur Llama Marmot Moose Narwhal Ocelot
Orca Osprey Parrot Pelican Puffin Python Quokka Raven Salmon Seal Shark Sloth Sparrow Stork Tapir Toucan
Turtle Walrus Weasel Whale Wolf Wombat Yak Zebra Alpaca Bobcat Camel Condor Cougar Finch Gopher""".split()


def random_name(attempt: int = 0) -> str:
    """A random two-word label; after many collisions a numeric suffix keeps names unique."""
    name = f"{secrets.choice(ADJECTIVES)} {secrets.choice(ANIMALS)}"
    return name if attempt < 20 else f"{name} {secrets.randbelow(100000)}"
