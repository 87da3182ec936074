// See README.md: declarations for compiling torch's ProcessGroupGloo.hpp without Gloo's headers.
#pragma once
