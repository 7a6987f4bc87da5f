"""Word banks of the demo suite: small hand-written English facts (capitals, plurals, past tenses, antonyms, ...).

Wide on purpose: several hundred distinct words, so the two demo tokenizers reach their vocabulary sizes and
split rarer words differently. Every fact is common knowledge; changing any list changes `SUITE_VERSION`
(through the suite's fingerprint), which retrains the cached demo teacher.
"""

from __future__ import annotations


def _pairs(text: str) -> dict[str, str]:
    """'a=b; c=d' -> {'a': 'b', 'c': 'd'} (whitespace around items ignored)."""
    out: dict[str, str] = {}
    for item in text.split(";"):
        item = item.strip()
        if item:
            key, value = item.split("=")
            out[key.strip()] = value.strip()
    return out


CAPITALS = _pairs("""
France=Paris; Germany=Berlin; Italy=Rome; Spain=Madrid; Portugal=Lisbon; Japan=Tokyo; China=Beijing;
India=New Delhi; Egypt=Cairo; Kenya=Nairobi; Canada=Ottawa; Mexico=Mexico City; Brazil=Brasilia;
Argentina=Buenos Aires; Peru=Lima; Chile=Santiago; Russia=Moscow; Poland=Warsaw; Greece=Athens; Turkey=Ankara;
Norway=Oslo; Sweden=Stockholm; Finland=Helsinki; Denmark=Copenhagen; Ireland=Dublin; Austria=Vienna;
Hungary=Budapest; Belgium=Brussels; the Netherlands=Amsterdam; Switzerland=Bern; Australia=Canberra;
Thailand=Bangkok; Vietnam=Hanoi; Indonesia=Jakarta; Iran=Tehran; Iraq=Baghdad; Nigeria=Abuja; Ghana=Accra;
Morocco=Rabat; Cuba=Havana; Colombia=Bogota; Venezuela=Caracas; South Korea=Seoul; the Philippines=Manila;
Malaysia=Kuala Lumpur; Pakistan=Islamabad; Ethiopia=Addis Ababa; Ukraine=Kyiv; Romania=Bucharest;
the Czech Republic=Prague; Iceland=Reykjavik; New Zealand=Wellington; Saudi Arabia=Riyadh; Qatar=Doha;
Nepal=Kathmandu; Mongolia=Ulaanbaatar; Uganda=Kampala; Senegal=Dakar; Tunisia=Tunis; Uruguay=Montevideo;
Jamaica=Kingston; Croatia=Zagreb; Serbia=Belgrade; Bulgaria=Sofia; Latvia=Riga; Estonia=Tallinn;
Lithuania=Vilnius; Slovakia=Bratislava; Slovenia=Ljubljana; Albania=Tirana; Cyprus=Nicosia; Malta=Valletta;
Luxembourg=Luxembourg; Jordan=Amman; Lebanon=Beirut; Syria=Damascus; Afghanistan=Kabul; Bangladesh=Dhaka;
Sri Lanka=Colombo; Cambodia=Phnom Penh; Laos=Vientiane; Zambia=Lusaka; Zimbabwe=Harare; Angola=Luanda;
Tanzania=Dodoma; Rwanda=Kigali; Sudan=Khartoum; Libya=Tripoli; Algeria=Algiers; Ecuador=Quito;
Paraguay=Asuncion; Panama=Panama City; Honduras=Tegucigalpa; Nicaragua=Managua; Guatemala=Guatemala City
""")

PLURALS = _pairs("""
cat=cats; dog=dogs; box=boxes; mouse=mice; child=children; man=men; woman=women; tooth=teeth; foot=feet;
goose=geese; leaf=leaves; knife=knives; wolf=wolves; city=cities; baby=babies; story=stories; party=parties;
bus=buses; church=churches; dish=dishes; potato=potatoes; tomato=tomatoes; hero=heroes; fish=fish;
sheep=sheep; deer=deer; person=people; ox=oxen; cactus=cacti; fungus=fungi; crisis=crises;
analysis=analyses; phenomenon=phenomena; life=lives; wife=wives; half=halves; shelf=shelves; loaf=loaves;
thief=thieves; key=keys; day=days; toy=toys; boy=boys; lady=ladies; country=countries; berry=berries;
fox=foxes; watch=watches; glass=glasses; class=classes; brush=brushes; match=matches; kiss=kisses;
roof=roofs; chef=chefs; photo=photos; piano=pianos; radio=radios; zoo=zoos; bird=birds; tree=trees;
house=houses; river=rivers; mountain=mountains; window=windows; garden=gardens; bottle=bottles;
candle=candles; pencil=pencils; table=tables; chair=chairs; doctor=doctors; teacher=teachers;
farmer=farmers; island=islands; bridge=bridges; castle=castles; flower=flowers; cloud=clouds;
library=libraries; factory=factories; puppy=puppies; monkey=monkeys; valley=valleys; journey=journeys;
echo=echoes; volcano=volcanoes; calf=calves; scarf=scarves; wharf=wharves; louse=lice; cherry=cherries;
lorry=lorries; memory=memories; hobby=hobbies; address=addresses; witness=witnesses; beach=beaches;
fairy=fairies; torch=torches; lunch=lunches; inch=inches; wish=wishes; quiz=quizzes; tax=taxes;
ship=ships; coin=coins; lamp=lamps; shoe=shoes; sock=socks; ring=rings; cup=cups; plate=plates;
spoon=spoons; fork=forks; map=maps; letter=letters; ticket=tickets; market=markets; village=villages;
forest=forests; desert=deserts; ocean=oceans; planet=planets; star=stars; moon=moons; engine=engines
""")

PAST_TENSES = _pairs("""
go=went; see=saw; eat=ate; run=ran; write=wrote; swim=swam; sing=sang; drink=drank; begin=began;
break=broke; bring=brought; buy=bought; catch=caught; choose=chose; come=came; do=did; draw=drew;
drive=drove; fall=fell; feel=felt; fight=fought; find=found; fly=flew; forget=forgot; freeze=froze;
get=got; give=gave; grow=grew; have=had; hear=heard; hide=hid; hold=held; keep=kept; know=knew;
leave=left; lend=lent; lose=lost; make=made; meet=met; pay=paid; ride=rode; rise=rose;
say=said; sell=sold; send=sent; shake=shook; shine=shone; shoot=shot; sit=sat; sleep=slept; speak=spoke;
spend=spent; stand=stood; steal=stole; stick=stuck; strike=struck; swing=swung; take=took; teach=taught;
tear=tore; tell=told; think=thought; throw=threw; understand=understood; wake=woke; wear=wore; win=won;
walk=walked; jump=jumped; play=played; cook=cooked; clean=cleaned; open=opened; climb=climbed;
dance=danced; smile=smiled; laugh=laughed; paint=painted; carry=carried; study=studied; try=tried;
cry=cried; stop=stopped; plan=planned; travel=travelled; visit=visited; listen=listened; answer=answered;
help=helped; work=worked; call=called; ask=asked; move=moved; live=lived; love=loved; hope=hoped;
wait=waited; start=started; finish=finished; push=pushed; pull=pulled; bake=baked; borrow=borrowed;
explain=explained; follow=followed; gather=gathered; imagine=imagined; knit=knitted; marry=married;
notice=noticed; offer=offered; prefer=preferred; remember=remembered; shout=shouted; whisper=whispered
""")

ANTONYMS = _pairs("""
hot=cold; big=small; fast=slow; happy=sad; early=late; open=closed; full=empty; hard=soft; high=low;
long=short; old=young; rich=poor; strong=weak; thick=thin; wet=dry; clean=dirty; loud=quiet; heavy=light;
cheap=expensive; easy=difficult; near=far; wide=narrow; deep=shallow; sharp=blunt; brave=cowardly;
kind=cruel; polite=rude; true=false; safe=dangerous; sweet=bitter; first=last; inside=outside; up=down;
awake=asleep; bright=dim; calm=nervous; generous=selfish; humble=proud; ancient=modern; rough=smooth;
tidy=messy; tight=loose; visible=invisible; wild=tame; wise=foolish; guilty=innocent; public=private;
simple=complex; sunny=cloudy; victory=defeat; maximum=minimum; arrive=depart; accept=refuse; buy=sell;
remember=forget; increase=decrease; include=exclude; begin=end; question=answer; north=south; east=west
""")

# name: (size, habitat, food, trait)
ANIMALS: dict[str, tuple[str, str, str, str]] = {
    "fox": ("small", "forest", "mice and berries", "clever"),
    "lion": ("large", "savanna", "zebras and antelopes", "strong"),
    "elephant": ("huge", "savanna", "grass and leaves", "gentle"),
    "penguin": ("medium", "Antarctic", "fish and krill", "playful"),
    "owl": ("small", "forest", "mice and insects", "quiet"),
    "camel": ("large", "desert", "dry plants", "patient"),
    "dolphin": ("large", "ocean", "fish and squid", "friendly"),
    "rabbit": ("small", "meadow", "grass and carrots", "shy"),
    "eagle": ("medium", "mountains", "fish and small animals", "sharp-eyed"),
    "frog": ("tiny", "pond", "flies and worms", "noisy"),
    "giraffe": ("huge", "savanna", "acacia leaves", "calm"),
    "bear": ("large", "forest", "berries, fish and honey", "powerful"),
    "wolf": ("medium", "forest", "deer and rabbits", "loyal"),
    "shark": ("large", "ocean", "fish and seals", "fearsome"),
    "squirrel": ("small", "forest", "nuts and seeds", "busy"),
    "tiger": ("large", "jungle", "deer and wild pigs", "fierce"),
    "koala": ("small", "eucalyptus forest", "eucalyptus leaves", "sleepy"),
    "parrot": ("small", "jungle", "fruit and seeds", "colourful"),
    "horse": ("large", "grassland", "grass and hay", "fast"),
    "cow": ("large", "farm", "grass", "gentle"),
    "goat": ("medium", "mountains", "shrubs and grass", "curious"),
    "hedgehog": ("tiny", "garden", "beetles and worms", "prickly"),
    "otter": ("small", "river", "fish and crabs", "playful"),
    "whale": ("enormous", "ocean", "krill and small fish", "gentle"),
    "zebra": ("large", "savanna", "grass", "striped"),
    "kangaroo": ("large", "outback", "grass and leaves", "bouncy"),
    "panda": ("large", "bamboo forest", "bamboo", "peaceful"),
    "crocodile": ("large", "river", "fish and birds", "dangerous"),
    "bat": ("tiny", "cave", "insects and fruit", "nocturnal"),
    "beaver": ("medium", "river", "tree bark and plants", "hard-working"),
    "seal": ("medium", "coast", "fish", "graceful"),
    "turtle": ("medium", "ocean", "jellyfish and seagrass", "slow"),
    "swan": ("medium", "lake", "water plants", "elegant"),
    "moose": ("huge", "northern forest", "twigs and water plants", "tall"),
    "badger": ("medium", "woodland", "worms and roots", "stubborn"),
    "falcon": ("small", "cliffs", "smaller birds", "swift"),
    "lizard": ("tiny", "desert", "insects", "quick"),
    "gorilla": ("large", "rainforest", "leaves and fruit", "intelligent"),
    "flamingo": ("medium", "lagoon", "shrimp and algae", "pink"),
    "octopus": ("medium", "ocean", "crabs and shellfish", "clever"),
    "hamster": ("tiny", "burrow", "seeds and grains", "cuddly"),
    "raccoon": ("small", "woodland", "almost anything", "curious"),
    "walrus": ("huge", "Arctic", "clams", "tusked"),
    "peacock": ("medium", "woodland", "seeds and insects", "proud"),
    "cheetah": ("medium", "savanna", "gazelles", "fast"),
    "hippo": ("huge", "river", "grass", "grumpy"),
}

FRUITS = ("apple banana cherry grape lemon mango orange peach pear plum melon kiwi apricot papaya pineapple "
          "strawberry coconut lime fig raspberry blueberry watermelon pomegranate grapefruit tangerine").split()
COLOURS = ("red blue green yellow purple pink brown black white grey violet turquoise crimson silver gold beige "
           "indigo magenta maroon scarlet navy olive teal amber").split()
TOOLS = ("hammer saw drill wrench screwdriver shovel rake ladder chisel pliers axe scissors needle trowel "
         "spanner crowbar sander stapler tape-measure wheelbarrow").split()
INSTRUMENTS = ("violin guitar drum flute trumpet cello harp clarinet saxophone trombone banjo ukulele oboe "
               "accordion harmonica tuba xylophone mandolin bagpipes tambourine").split()
VEHICLES = ("car bicycle train truck boat plane tractor scooter tram ferry helicopter motorbike van canoe "
            "submarine yacht rocket taxi caravan sledge").split()
CATEGORIES: dict[str, tuple[str, ...]] = {
    "an animal": tuple(ANIMALS),
    "a fruit": tuple(FRUITS),
    "a colour": tuple(COLOURS),
    "a tool": tuple(TOOLS),
    "a musical instrument": tuple(INSTRUMENTS),
    "a vehicle": tuple(VEHICLES),
}

# Words used in list tasks (reverse, longest, count, ...): the nouns of the suite, varied lengths.
LIST_WORDS = tuple(sorted({*PLURALS, *ANIMALS, *FRUITS, *TOOLS, *INSTRUMENTS, *VEHICLES} - {"tape-measure"}))

NAMES = ("Anna Ben Carla David Emma Felix Grace Henry Isla Jack Kira Leo Maya Noah Olivia Paul Quinn Rosa Sam "
         "Tara Umar Vera Will Xenia Yusuf Zoe Amir Bella Chen Diego Elena Farah Gabriel Hana Ivan Julia Kofi Lena "
         "Marco Nadia Oscar Priya Rafael Sofia Tomas Uma Victor Wendy Yara Zain").split()
EVENTS = ("birthday party", "picnic", "concert", "dinner", "barbecue", "football match", "book club meeting",
          "movie night", "wedding", "garden party", "game night", "beach trip", "art show", "school play",
          "cooking class", "quiz night", "music festival", "hiking trip")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = ("market", "library", "park", "museum", "beach", "bakery", "station", "zoo", "harbour", "cinema",
          "village", "farm", "school", "hospital", "castle", "bookshop", "post office", "swimming pool")
ITEMS = ("apples", "books", "pens", "candles", "shirts", "tickets", "flowers", "cups", "stamps", "postcards",
         "oranges", "eggs", "bread rolls", "notebooks", "plates", "batteries", "scarves", "pencils")
PEOPLE_DOING = ("reading a newspaper", "walking a dog", "selling vegetables", "playing the guitar",
                "painting a picture", "feeding the ducks", "taking photos", "waiting for a bus")

# activity: tips (each a short imperative sentence)
TIPS: dict[str, tuple[str, ...]] = {
    "learning a language": ("Practise a little every day.", "Speak with native speakers.",
                            "Learn the most common words first.", "Watch films with subtitles."),
    "saving money": ("Make a monthly budget.", "Cook at home more often.", "Avoid buying things on impulse.",
                     "Put some money aside every payday."),
    "sleeping well": ("Go to bed at the same time every night.", "Avoid screens before bed.",
                      "Keep your bedroom cool and dark.", "Do not drink coffee in the evening."),
    "studying for an exam": ("Start revising early.", "Take short breaks.", "Test yourself with old questions.",
                             "Get enough sleep the night before."),
    "running a marathon": ("Increase your distance slowly.", "Eat well before long runs.",
                           "Buy good running shoes.", "Rest when your body hurts."),
    "keeping a plant alive": ("Water it regularly but not too much.", "Give it enough light.",
                              "Use a pot with drainage holes.", "Remove dead leaves."),
    "writing an essay": ("Plan your main points first.", "Write a clear introduction.",
                         "Use one paragraph for each idea.", "Read it again before you submit it."),
    "staying focused": ("Turn off notifications.", "Work in short blocks of time.",
                        "Keep your desk tidy.", "Set one clear goal for each session."),
    "travelling cheaply": ("Book tickets early.", "Travel outside the busy season.",
                           "Stay in hostels or with friends.", "Eat where the locals eat."),
    "making friends": ("Join a club or a class.", "Ask people about themselves.",
                       "Say yes to invitations.", "Be patient and friendly."),
    "speaking in public": ("Practise your talk out loud.", "Know your first sentence by heart.",
                           "Look at the audience.", "Speak slowly and clearly."),
    "cooking pasta": ("Use plenty of water.", "Add salt to the boiling water.",
                      "Stir the pasta now and then.", "Taste it before you drain it."),
    "staying healthy": ("Eat fruit and vegetables every day.", "Walk for half an hour daily.",
                        "Drink enough water.", "Sleep at least seven hours."),
    "growing tomatoes": ("Plant them in a sunny spot.", "Water the soil, not the leaves.",
                         "Tie the stems to a stick.", "Pick the fruit when it is red."),
}
