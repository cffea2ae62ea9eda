# Configures, builds and runs the consumer project in WORK against qomem, in one of two modes:
#   MODE=install       install the qomem build tree QOMEM_BUILD into PREFIX; find_package(qomem) there
#   MODE=subdirectory  add_subdirectory(QOMEM_SOURCE) from the consumer
# Also takes CONSUMER_SOURCE, GENERATOR and CXX (the compiler).
#   cmake -DMODE=... ... -P run_consumer.cmake
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command "${ARGV}")
    message(FATAL_ERROR "failed (${result}): ${command}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK})
if(MODE STREQUAL "install")
  file(REMOVE_RECURSE ${PREFIX})
  run(${CMAKE_COMMAND} --install ${QOMEM_BUILD} --prefix ${PREFIX})
  set(use_qomem -DCMAKE_PREFIX_PATH=${PREFIX})
elseif(MODE STREQUAL "subdirectory")
  set(use_qomem -DQOMEM_CONSUMER_VIA_SUBDIR=${QOMEM_SOURCE})
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE must be install or subdirectory, not '${MODE}'")
endif()

run(${CMAKE_COMMAND} -S ${CONSUMER_SOURCE} -B ${WORK} -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX} ${use_qomem})
run(${CMAKE_COMMAND} --build ${WORK})
run(${WORK}/qomem_consumer)
