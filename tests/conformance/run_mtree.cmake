# Runs mtree on one machine's fixture.json and compares its output with QEMU's.
#   cmake -DMTREE=<mtree> -DPYTHON=<python3> -DMACHINE_DIR=<qemu-7.2/machine> -DOUTPUT=<file>
#         -DMODE=flatview|tree -P run_mtree.cmake
# flatview: `mtree fixture.json` against mtree-f.txt (compare_flatviews.py, QEMU's rule);
# tree:     `mtree --tree fixture.json` against mtree-D.txt (compare_mtree_tree.py).
foreach(var MTREE PYTHON MACHINE_DIR OUTPUT MODE)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_mtree.cmake: -D${var}=... is required")
  endif()
endforeach()

if(MODE STREQUAL "flatview")
  set(args fixture.json)
  set(expected mtree-f.txt)
  set(compare compare_flatviews.py)
elseif(MODE STREQUAL "tree")
  set(args --tree fixture.json)
  set(expected mtree-D.txt)
  set(compare compare_mtree_tree.py)
else()
  message(FATAL_ERROR "run_mtree.cmake: MODE must be flatview or tree, not '${MODE}'")
endif()

cmake_path(GET OUTPUT PARENT_PATH output_dir)
file(MAKE_DIRECTORY ${output_dir})

execute_process(COMMAND ${MTREE} ${args}
  WORKING_DIRECTORY ${MACHINE_DIR}
  OUTPUT_FILE ${OUTPUT}
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "mtree ${args} failed (${result}) in ${MACHINE_DIR}")
endif()

execute_process(COMMAND ${PYTHON} ${CMAKE_CURRENT_LIST_DIR}/${compare} ${expected} ${OUTPUT}
  WORKING_DIRECTORY ${MACHINE_DIR}
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "output differs: expected ${MACHINE_DIR}/${expected}, got ${OUTPUT}")
endif()
