# Captures one machine state from a real QEMU with `mtree capture` and checks
# the round trip: the fixture imported from QEMU's text must print QEMU's
# `info mtree -f`, `info mtree -D` and `info mtree -o -D` (compare_*.py rule).
#   cmake -DMTREE=<mtree> -DPYTHON=<python3> -DSECONDS=<n> -DCOMMAND=<qemu command line>
#         -DOUT=<dir> [-DCOMMITTED=<qemu-7.2/NAME>] -P run_capture.cmake
# With COMMITTED and SECONDS 0 (a machine at reset, which is deterministic),
# the fresh texts must also equal the committed ones.
foreach(var MTREE PYTHON SECONDS COMMAND OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_capture.cmake: -D${var}=... is required")
  endif()
endforeach()

file(REMOVE_RECURSE ${OUT})
separate_arguments(qemu UNIX_COMMAND "${COMMAND}")
set(capture ${MTREE} capture --out ${OUT} --timeout 60)
if(NOT SECONDS EQUAL 0)
  list(APPEND capture --run ${SECONDS})
endif()
execute_process(COMMAND ${capture} -- ${qemu} RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "mtree capture failed (${result}): ${COMMAND}")
endif()

function(compare script expected actual)
  execute_process(COMMAND ${PYTHON} ${CMAKE_CURRENT_LIST_DIR}/${script} ${expected} ${actual}
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "differs: expected ${expected}, got ${actual}")
  endif()
endfunction()

foreach(mode IN ITEMS flat tree owners)
  if(mode STREQUAL "flat")
    set(args "")
    set(expected mtree-f.txt)
    set(script compare_flatviews.py)
  elseif(mode STREQUAL "tree")
    set(args --tree)
    set(expected mtree-D.txt)
    set(script compare_mtree_tree.py)
  else()
    set(args --tree --owner)
    set(expected mtree-oD.txt)
    set(script compare_mtree_tree.py)
  endif()
  execute_process(COMMAND ${MTREE} ${args} ${OUT}/fixture.json
    OUTPUT_FILE ${OUT}/qomem-${mode}.txt RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "mtree ${args} ${OUT}/fixture.json failed (${result})")
  endif()
  compare(${script} ${OUT}/${expected} ${OUT}/qomem-${mode}.txt)
  if(DEFINED COMMITTED AND SECONDS EQUAL 0)
    compare(${script} ${COMMITTED}/${expected} ${OUT}/${expected})
  endif()
endforeach()
