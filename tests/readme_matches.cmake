# Fails unless README.md contains SOURCE verbatim: the quick start a reader copies is the one
# the build compiles.
file(READ "${README}" readme)
file(READ "${SOURCE}" source)
string(FIND "${readme}" "${source}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "README.md does not contain ${SOURCE} verbatim: update the quick start")
endif()
